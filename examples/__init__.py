"""Example plugins: real small models that run on the CPU."""
