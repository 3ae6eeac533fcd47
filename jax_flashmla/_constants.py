"""Numbers shared by the Python side and the CUDA side (csrc/mla_params.h): change both together."""

HEAD_DIM_QK = 576        # 512 latent values + 64 RoPE values per cached token
HEAD_DIM_V = 512         # V is the first 512 columns of the same cached row
PAGE_SIZE = 64           # tokens per page of the paged cache
ROWS_PER_QUERY_TILE = 64 # query rows (token-major: token * heads_per_kv + head) per CTA tile
FIXED_OVERHEAD_PAGES = 5 # scheduler's per-sequence charge for loading Q, writing O, combining
SCHEDULER_FIELDS = 8     # int32 fields of one tile-scheduler metadata row
MAX_SEQLEN_K = 1 << 24   # longest sequence / block-table capacity
MAX_BATCH = 8192         # with MAX_SEQLEN_K, keeps the scheduler's int32 cost sums exact

# SM count assumed when no GPU is attached (an H100 SXM), so CPU-made metadata has the shape an
# H100 would use.
DEFAULT_NUM_SMS = 132
