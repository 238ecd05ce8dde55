"""LDFS: language-guided synthesis of CLIP image features of unseen domains (and the LADS baseline)."""
