"""The replicated PROV ledger: blocks, commit certificates, the pattern's state machine and offline verification."""
