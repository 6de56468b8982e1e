"""Building blocks every layer uses: errors, crash-safe writes."""
