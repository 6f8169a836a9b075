"""The gateway's durable stores, both on the core's segment log (`ltrec_core.segment_log`):
`feedback` (served lists and Feedback events, training data) and `items` (items added or hidden
after training, shared by every replica)."""
