"""Raft consensus: a sans-IO core, its durable storage and its MQTT transport."""
