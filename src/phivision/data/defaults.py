"""Defaults of ``sample``, ``prepare`` and ``inspect``, defined once: the library functions and the CLI both read
them. Plain constants, no imports, so the CLI can read them without loading the data stack."""

# ----------------------------------------------------------------------------------------------- sample
SAMPLE_N = 600  # products drawn by `phivision sample` (with --like: as many as the dataset it copies)
SAMPLE_SEED = 0
SAMPLE_VIEWS = 1  # the most photos per product `phivision sample` draws (1 to 4)
SPLIT = "0.8,0.1,0.1"  # train,val,test ratios (sample and prepare)
BASE_URL = "http://127.0.0.1:8000"

# ---------------------------------------------------------------------------------------------- prepare
# source columns; the defaults fit the DBQ `<Brand>.Product.prices.<Country>` datasets
TITLE_COL = "title"
CATEGORY_COL = "category3_code"
PRICE_COL = "full_price"
IMAGE_COL = "imageurl"
CODE_COL = "product_code"
CURRENCY_COL = "currency_code"
HUB_SPLIT = "train"
PREPARE_SEED = 0
MAX_PRICE = 1_000_000_000.0  # a price above this is a typo or a placeholder (absurd_price), never a product

# downloads
CONCURRENCY = 64  # requests in flight overall
PER_HOST = 32  # requests in flight per host
CONNECT_TIMEOUT = 10.0  # seconds to wait for a connection
READ_TIMEOUT = 30.0  # seconds to wait for the next bytes
DOWNLOAD_TIMEOUT = 180.0  # seconds one download (one attempt, headers to last byte) may take in all
RETRIES = 3  # extra attempts after the first
BACKOFF = 0.5  # first retry waits about this long, then doubles (with jitter)
MAX_WAIT = 30.0  # cap on any backoff or Retry-After wait
MAX_BYTES = 50_000_000  # largest image file accepted (download or local file)
MAX_PIXELS = 40_000_000  # = phivision.data.images.DEFAULT_MAX_PIXELS

# ---------------------------------------------------------------------------------------------- inspect
NUM_CROPS = "1,4,8,16"  # num_crops values whose image-token cost `inspect` tabulates
CROP_SIZE = 336  # official Phi-3-Vision tile side in pixels
NUM_IMG_TOKENS = 144  # official tokens per tile, (336 // 28) ** 2
NEAR_DUPLICATE_BITS = 6  # perceptual hashes at most this many bits apart (of 64) count as near-duplicates
