"""Cluster: connect to Ray, submit stages as Ray jobs, start local clusters."""
