//! Segmentation networks: ResNet backbones (dilated, output stride 8), DeepLab v2 (ASPP main
//! head on layer4, auxiliary head on layer3) and DeepLab v3+, each with the projection head
//! that feeds the contrastive units.

pub mod deeplab;
pub mod layers;
pub mod resnet;
pub mod weights;

pub use deeplab::{SegNet, SegOutput};
