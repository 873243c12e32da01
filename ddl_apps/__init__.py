"""ddl_apps: distributed deep-learning trainers on one Horovod core."""
