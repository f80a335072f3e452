"""Host capability report (the doctor): what isolation this machine can offer and why."""
