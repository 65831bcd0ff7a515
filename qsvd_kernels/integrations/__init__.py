"""Model integrations: finding attention layers in Hugging Face models,
sentence-embedding helpers, and (later) modules running on the qsvd ops."""
