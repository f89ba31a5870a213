"""Sink runtime: consumes one channel's intents and delivers them through its connector.

One module per job: ``consumer`` (Kafka, rebalances), ``windows`` (offset tracking),
``dedupe`` (skip decisions), ``limits`` (connector limits, provider pauses), ``breaker``,
``retry``, ``outputs`` (retry, dead-letter and status records), ``checkpoint`` (group
commit), ``ledger*`` (the delivery ledger); ``runtime.SinkWorker`` wires them together.
"""
