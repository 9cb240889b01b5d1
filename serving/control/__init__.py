"""The control plane: the live pool directory, the actuator that changes it, and worker health."""
