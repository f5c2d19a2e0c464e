"""Device SDK, sensor simulators and actuators."""
