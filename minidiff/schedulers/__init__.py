"""The samplers: each file is one method, written as its paper writes it."""
