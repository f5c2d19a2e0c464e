"""`tomq demo`: a whole cluster on this machine in one command (scenarios, the run, the live view)."""
