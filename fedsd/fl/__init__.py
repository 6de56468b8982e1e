"""The federated-learning mechanics of a round: the wire payload, the SecAgg+ round, reading
and checking replies, aggregation, checkpoints and the round record (history)."""
