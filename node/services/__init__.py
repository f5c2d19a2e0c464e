"""tomq.node.services."""
