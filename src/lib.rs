pub mod tinymem;
