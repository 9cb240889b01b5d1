"""Training the shapes-world model (`epd model train`): batches, the loop, and the shipped export."""
