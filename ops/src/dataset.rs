//! Image datasets in the image-folder convention (placeholder: see issue 3).
