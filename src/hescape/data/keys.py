"""Names of record columns (parquet) and of in-memory ``obs`` columns, in one place."""

# Record columns of the HESCAPE parquet layout (Hugging Face ``Peng-AI/hescape-pyarrow``).
NAME = "name"  # sample id (ClassLabel in the Hugging Face files, string in curated files)
IMAGE = "image"  # struct {bytes: PNG, path: str}
GEXP = "gexp"  # raw integer counts, shape (1, G)
SOURCE = "source"
TISSUE = "tissue"
CELL_COORDS = "cell_coords"
REQUIRED_COLUMNS = (NAME, IMAGE, GEXP, SOURCE, TISSUE)

# Columns curated panels add.
DONOR = "donor"
MUTATION = "mutation"  # simulator's sample-level binary label
CELL_TYPE = "cell_type"  # simulator's dominant cell type (ground truth)
COMPOSITION = "composition"  # simulator's per-spot cell-type fractions (ground truth)
STATE = "state"  # simulator's per-spot programme states (ground truth)
OBSM_COLUMNS = (COMPOSITION, STATE)  # per-spot vectors read into Panel.obsm

# In-memory ``Panel.obs`` columns.
SAMPLE = "sample_id"
SPLIT = "split"
X, Y = "x", "y"

PANEL_JSON = "panel.json"
FORMAT_VERSION = 1
