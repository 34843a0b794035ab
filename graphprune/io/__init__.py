"""Files in and out: which paths may be written or read (`paths`)."""
