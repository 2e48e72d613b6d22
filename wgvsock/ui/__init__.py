"""What people look at: the status dashboard, the demo and the namespace lab it runs in."""
