"""The `swarm` command: parses arguments into config objects and starts components."""
