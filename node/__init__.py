"""The node daemon: Raft (sans-IO core, storage, MQTT transport), ledger, orchestrator, runtimes, monitor."""
