"""The worker manager: providers, health checks and the autoscaler."""
