"""The SLO-driven controller: observe the deployment, decide which roles to move, act through the
control plane. The policy (`policy.decide`) does no I/O, so the simulator runs the very same code."""
