"""The Llama model: its arguments (args), modules (llama), TP sharding and initialisation
(weights) and the Hugging Face name table (hf)."""
