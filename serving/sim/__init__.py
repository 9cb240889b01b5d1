"""A discrete-event simulator of E, P and D pools that runs the live controller's policy on a
simulated clock, calibrated by `epd profile` on the real engine."""
