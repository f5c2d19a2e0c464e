"""Serial <-> MQTT bridge for sensors on a UART line, and the reference firmware."""
