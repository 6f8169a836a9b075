"""The gateway's stores. Durable, on the core's segment log (`ltrec_core.segment_log`):
`feedback` (served lists and Feedback events, training data) and `items` (items added or hidden
after training, shared by every replica). And `history` (each user's recent events, for a
Recommend with only a user_id), on SQLite (`history_sqlite`) or Redis (`history_redis`)."""
