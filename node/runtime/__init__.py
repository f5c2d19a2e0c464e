"""tomq.node.runtime."""
