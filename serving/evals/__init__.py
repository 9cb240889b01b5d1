"""The shapes world: a synthetic visual question-answering task with known answers, and `epd eval`."""
