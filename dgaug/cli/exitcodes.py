"""Exit codes of the `dgaug` command, stable so that scripts can branch on them."""

OK = 0
FAILED = 1  # some shards failed after their retries; `dgaug status` lists them
INVALID = 2  # the manifest, the source or the arguments are wrong; nothing was done
REFUSED = 3  # another run holds the output, or committed shards were made with another config
PENDING = 4  # `status`: work remains (not started, or shards not yet committed)
INTERRUPTED = 130
