"""llamaforge: from raw domain data to a fine-tuned, evaluated, exported and served Llama model."""

from llamaforge.offline import apply_network_guards
from llamaforge.quiet import silence_known_noise

__version__ = "0.1.0"

apply_network_guards()
silence_known_noise()
