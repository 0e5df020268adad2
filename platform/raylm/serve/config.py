"""Config of the serve stage: the models, the HTTP endpoint and autoscaling."""

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection


class AutoscalingConfig(ConfigSection):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0.0)
    upscale_delay_s: float = Field(5.0, ge=0.0)
    downscale_delay_s: float = Field(30.0, ge=0.0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ServeConfig(ConfigSection):
    models: dict[str, str]
    """Model name (the OpenAI `model` field) -> exported model directory."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None
    """When set, requests need `Authorization: Bearer <api_key>`."""
    max_tokens_limit: int = Field(256, ge=1)
    """Largest max_tokens a request may ask for."""
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    num_cpus_per_replica: float = Field(1.0, gt=0.0)
    autoscaling: AutoscalingConfig = AutoscalingConfig()
