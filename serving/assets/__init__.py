"""Files shipped inside the package: the trained default model `epd-shapes`."""
