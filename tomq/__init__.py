"""tomq: Trusted Orchestration Management over MQTT.

The core in this package (identity, wire, topics, records, CLI) depends on none of the component
packages (tomq.broker, tomq.node, tomq.sensors, tomq.bridge).
"""

__version__ = "0.1.0"
