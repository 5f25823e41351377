// Found only when libtorch's own headers are not (see .cargo/config.toml): torch-sys's build
// then stops here, with this message, instead of a screenful of missing declarations.
#error "libtorch is not set up: run `make build` (or scripts/setup.sh) once; it installs torch into .venv and links .libtorch to it"
#include <libtorch-is-not-set-up>
