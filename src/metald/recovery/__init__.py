"""Orphan VMs (running with no record in the store): finding them and taking them back."""
