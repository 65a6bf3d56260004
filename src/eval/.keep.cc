// Keeps the pkv_eval library non-empty while it grows.
