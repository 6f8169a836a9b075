"""The core both the gateway (`server`) and the modelling package (`ltrec`) import.

Pure Python plus numpy and Pillow: no torch, no pandas, and nothing of this project outside it,
so the gateway's image stays small and training and serving cannot drift apart. It holds what both
sides must agree on: the tensor and file names (`contract`), an item's text (`item_text`) and
hashed attributes (`item_attributes`), the context buckets (`context`), image preprocessing
(`images`), the segment log both gateway stores write (`segment_log`, `feedback_log`) and the
typed, versioned schemas of the files passed between stages (`records`, `artifacts`).
"""
