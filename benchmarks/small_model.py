"""Prints the directory of the `small` preset, building it first if it is missing (for Makefile
targets that hand it to `epd profile`)."""

from serving.config import default_model_dir
from serving.engine.models.builder import ensure_model

if __name__ == "__main__":
    print(ensure_model(default_model_dir("small"), "small"))
