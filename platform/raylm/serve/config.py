"""Config of the serve stage: the models, the HTTP endpoint, batching and autoscaling."""

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection


class AutoscalingConfig(ConfigSection):
    """Ray Serve autoscaling of each model's replicas (the `autoscaling_config` of its deployment)."""

    min_replicas: int = Field(1, ge=0)
    """Replicas kept when idle; 0 scales to zero (the first request then waits for a model to load)."""
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0.0)
    """Requests in flight per replica that the autoscaler aims for."""
    upscale_delay_s: float = Field(5.0, ge=0.0)
    """How long the load must stay above target before replicas are added."""
    downscale_delay_s: float = Field(30.0, ge=0.0)
    """How long the load must stay below target before replicas are removed."""
    look_back_period_s: float = Field(10.0, gt=0.0)
    """The window the ongoing-request count is averaged over when deciding (Serve's default is 30 s)."""
    metrics_interval_s: float = Field(2.0, gt=0.0)
    """How often replicas report their ongoing requests to the autoscaler."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ServeConfig(ConfigSection):
    models: dict[str, str]
    """Model name (the OpenAI `model` field) -> exported model directory."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; 0.0.0.0 exposes the API beyond this machine."""
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None
    """When set, requests need `Authorization: Bearer <api_key>`."""
    max_tokens_limit: int = Field(256, ge=1)
    """Largest max_tokens a request may ask for."""
    max_batch_size: int = Field(8, ge=1)
    """Requests one model replica decodes together (continuous batching: they join and leave between steps); 1: no batching."""
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    """How long an idle replica waits, after a request arrives, for others to start decoding with it."""
    num_cpus_per_replica: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved by each model replica (also its torch thread count, at least 1)."""
    num_gpus_per_replica: float = Field(0.0, ge=0.0)
    """Ray GPUs per model replica; above 0 the model runs on CUDA."""
    ingress_replicas: int = Field(1, ge=1)
    """Replicas of the HTTP ingress (parsing and routing only; the models scale on their own)."""
    autoscaling: AutoscalingConfig = AutoscalingConfig()
