"""tomq.node.orchestrator."""
