"""Kafka clients, topic administration and the local broker."""
