"""Stage workers (E, P, D or colocated), their handles, pools, and cluster wiring."""
