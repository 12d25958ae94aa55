"""Ad-platform adapters: each sends outbox-shaped rows and returns per-row results."""
