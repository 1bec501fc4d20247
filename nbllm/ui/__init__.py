"""What people see: progress bars and plots.

It subscribes to executor events; nothing below it imports it.
"""
