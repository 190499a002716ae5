//! Every closed choice of the config (and of the CLI's flags) as an enum: one name per value,
//! in kebab-case, the same in TOML, on the command line, in messages and in records. A value
//! outside the set is a config error naming the key and the allowed names
//! (`validate::check_choices`).

use serde::{Deserialize, Serialize};
use strum::{IntoStaticStr, VariantArray, VariantNames};

/// A closed choice's name, as the config writes it.
pub trait Named: Copy + Into<&'static str> {
    fn name(self) -> &'static str {
        self.into()
    }
}

impl<T: Copy + Into<&'static str>> Named for T {}

/// The derives every choice has: serde and strum spell the names alike (both kebab-case; the
/// `every_choice_has_one_spelling` test holds them to it).
macro_rules! choice {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, IntoStaticStr, VariantNames,
            VariantArray, strum::Display, strum::EnumString)]
        #[serde(rename_all = "kebab-case")]
        #[strum(serialize_all = "kebab-case")]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }
    };
}

choice! {
    /// The layout a data set is stored in.
    pub enum DatasetKind {
        Gta5,
        Synthia,
        Synscapes,
        Cityscapes,
        /// CycleGAN-translated images of a source set, paired with that set's labels by file name.
        Translated,
        /// A packed shard written by `adamcu pack`.
        Shard,
    }
}

choice! {
    /// A Cityscapes split.
    pub enum Split {
        Train,
        Val,
    }
}

choice! {
    /// What a loader does with a sample it cannot read.
    pub enum OnBadSample {
        /// Count and log the sample with its path, then go on.
        Skip,
        /// Stop the run with the error.
        Stop,
    }
}

choice! {
    /// The segmentation network.
    pub enum Arch {
        /// DeepLab v2: the ASPP classifier on the dilated backbone (the paper's).
        Deeplabv2,
        /// DeepLab v3+: ASPP with image pooling and a decoder.
        Deeplabv3plus,
    }
}

choice! {
    /// The dilated ResNet under the head.
    pub enum Backbone {
        Resnet101,
        Resnet50,
        Resnet18,
        /// A small BasicBlock ResNet (`model.tiny_width`) for CPU runs.
        Tiny,
    }
}

choice! {
    /// The BatchNorm statistics a training step normalises with.
    pub enum BnStats {
        /// The stored running statistics (eval-mode BN): for pretrained backbones and tiny batches.
        Frozen,
        /// The batch's own: for small networks trained from scratch.
        Batch,
    }
}

choice! {
    /// The precision of the network's forward pass.
    pub enum Precision {
        Fp32,
        /// Autocast in bf16 on CUDA or the CPU; softmax statistics, uncertainty and losses stay fp32.
        Bf16,
    }
}

choice! {
    /// How labels are drawn from the groups (docs/algorithm.md, "Two readings").
    pub enum Schedule {
        /// Algorithm 1: G_h until Ma = Me/2, then G_m until Ma = Me.
        Sequential,
        /// Section III-B: each batch draws the same number from G_h and G_m.
        Simultaneous,
    }
}

choice! {
    /// A level of contrastive units (Section III-C).
    #[derive(Default)]
    pub enum Level {
        /// Pixels of one image.
        #[default]
        IntraImage,
        /// Pixels of two images of one domain.
        CrossImage,
        /// A source image's pixels with a target image's.
        CrossDomain,
    }
}

choice! {
    /// Whose anchors the cross-domain units hold (Section III-C; docs/algorithm.md, "Contrastive
    /// units"). The paper's Section I says the level aligns "the feature representations in the
    /// target domain ... to the source domain"; its Section III-C says only "anchors from one
    /// image in a certain domain" and keys "from another image from the other domain".
    pub enum CrossDomainAnchors {
        /// Both: source anchors against target keys and target anchors against source keys.
        Both,
        /// Target anchors against source keys only: the target pulled toward the source.
        Target,
        /// Source anchors against target keys only (the reverse, for comparison).
        Source,
    }
}

choice! {
    /// How the pixels of an image's anchors and keys are drawn when there are more than
    /// `contrast.max_anchors` / `contrast.max_keys` (docs/algorithm.md, "Contrastive units").
    /// The paper's anchor policy says it follows ContrastiveSeg [25], which draws its pixels
    /// class by class, an equal share for each class in the image; it does not say more.
    pub enum ContrastSampling {
        /// Every candidate pixel equally likely: a class's share of the sample is its share of
        /// the image's candidates, so large classes (road, building, sky) hold most of it.
        Uniform,
        /// Each class present among the image's candidates gets an equal share in expectation
        /// (weighted sampling without replacement, weight 1 / the class's candidate count): a
        /// class with fewer candidates than its share leaves its slots to the others.
        ClassBalanced,
    }
}

impl Level {
    pub const ALL: &'static [Level] = <Level as VariantArray>::VARIANTS;
}

choice! {
    /// The pixels the DCCM's error rates R (Eq. 7) are counted on.
    pub enum DccmFrom {
        /// The target pixels whose labels were bought (the confusions the paper motivates the
        /// DCCM with, sidewalk taken for road, are the target's).
        Target,
        /// Those and every labelled source pixel (the source's far more numerous pixels then
        /// make R mostly the source's).
        Both,
    }
}

choice! {
    /// An ablation preset: a row of the paper's Table VI (and two of our own), applied to a
    /// config by `ablation::apply`.
    #[derive(clap::ValueEnum)]
    pub enum Preset {
        /// Active labelling without adaptive sampling.
        AlWoAs,
        /// Active labelling with adaptive sampling.
        AlWAs,
        /// + intra-domain units (intra-image and cross-image).
        McuI,
        /// + cross-domain units.
        McuD,
        /// Pixel-to-pixel InfoNCE only, every level.
        P2p,
        /// Pixel-to-pixel and center-to-center, every level, no DCCM.
        P2pC2c,
        /// The full model: every level, p2p and c2c, the DCCM.
        Full,
        /// RIPU (Xie et al., CVPR 2022) instead of ADA-MCU: `active.strategy = "ripu"`.
        Ripu,
        /// Pixel entropy, selected in rounds (`active.strategy = "entropy"`).
        Entropy,
        /// Best-versus-second-best margin, selected in rounds (`active.strategy = "margin"`).
        Margin,
        /// Uniformly random, selected in rounds (`active.strategy = "random"`).
        Random,
    }
}

choice! {
    /// How target labels are chosen under the budget (`active.strategy`; docs/algorithm.md,
    /// "Strategies"). Every strategy buys through the same ledger and oracle.
    #[derive(clap::ValueEnum)]
    pub enum Strategy {
        /// ADA-MCU (this paper): per step, uncertainty groups and adaptive sampling.
        AdaMcu,
        /// RIPU: region impurity times prediction uncertainty, selected in rounds.
        Ripu,
        /// Highest pixel (or region mean) entropy, in rounds.
        Entropy,
        /// Smallest margin between the two most probable classes, in rounds.
        Margin,
        /// Uniformly random pixels (or regions), in rounds.
        Random,
    }
}

choice! {
    /// What a round strategy buys at once (`active.annotation`; RIPU's RA and PA settings).
    pub enum Annotation {
        /// A (2k+1)^2 square around each chosen pixel, k = `active.radius` (RIPU's RA).
        Region,
        /// Single pixels, none within `active.radius` of another (RIPU's PA).
        Pixel,
    }
}

choice! {
    /// Which row a row's paired gain is measured against (`demo.paired_against`).
    pub enum PairedAgainst {
        /// The row before it: the steps of the paper's Table VI.
        Previous,
        /// The first variant: each strategy against the first (`adamcu compare`).
        First,
    }
}

impl Strategy {
    /// Whether it buys in selection rounds over the whole target set (`active.rounds`), not
    /// per step.
    pub fn uses_rounds(self) -> bool {
        self != Strategy::AdaMcu
    }

    /// The demo row (`Preset`) that trains it: ADA-MCU's full model, or the strategy itself.
    pub fn preset(self) -> Preset {
        match self {
            Strategy::AdaMcu => Preset::Full,
            Strategy::Ripu => Preset::Ripu,
            Strategy::Entropy => Preset::Entropy,
            Strategy::Margin => Preset::Margin,
            Strategy::Random => Preset::Random,
        }
    }
}

choice! {
    /// Algorithm 1, line 1: how the source images are made to look like the target's
    /// (`adamcu translate`, `src/translate/`).
    pub enum TranslateMethod {
        /// No translation: `data.source` is read as it is.
        None,
        /// CycleGAN (Zhu et al. 2017) trained between the source and the target train images.
        Cyclegan,
        /// Fourier domain adaptation (Yang and Soatto 2020): the source's low-frequency
        /// amplitude spectrum swapped for a random target image's.
        Fda,
    }
}

choice! {
    /// FDA's low-frequency window (`translate.fda_window`): the paper and its code differ.
    pub enum FdaWindow {
        /// The paper's M_beta: beta H rows and beta W columns either side of the centre.
        PerSide,
        /// The authors' code: floor(beta min(H, W)) either side on both axes.
        Square,
    }
}

choice! {
    /// When FDA runs (`translate.fda_mode`): the paper's code swaps spectra per batch as it
    /// trains, with a new random target image each time; writing the translated set once is
    /// the cheaper reading.
    pub enum FdaMode {
        /// Once, before pretraining: each source image with one target image drawn for it,
        /// written to `data.source.root` like the CycleGAN's output.
        Offline,
        /// In the source loader, per sample drawn: a target image drawn from the sample's
        /// seed, so each epoch pairs a source image with another target (deterministic for a
        /// seed). Nothing is written; training reads the original set.
        Online,
    }
}

impl Preset {
    /// The row's name in the demo's table and the paper's Table VI.
    pub fn row_name(self) -> &'static str {
        match self {
            Preset::AlWoAs => "AL w/o AS",
            Preset::AlWAs => "AL w AS",
            Preset::McuI => "AL w AS + MCU-i",
            Preset::McuD => "AL w AS + MCU-i + MCU-d",
            Preset::P2p => "p2p only",
            Preset::P2pC2c => "p2p + c2c",
            Preset::Full => "full model (DCCM)",
            Preset::Ripu => "RIPU",
            Preset::Entropy => "entropy",
            Preset::Margin => "margin",
            Preset::Random => "random",
        }
    }

    /// The strategy the row trains with.
    pub fn strategy(self) -> Strategy {
        match self {
            Preset::Ripu => Strategy::Ripu,
            Preset::Entropy => Strategy::Entropy,
            Preset::Margin => Strategy::Margin,
            Preset::Random => Strategy::Random,
            _ => Strategy::AdaMcu,
        }
    }
}

/// `names` quoted, as a message lists the allowed values: `"a", "b" or "c"`.
pub fn allowed(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_names<T: Serialize + VariantArray>() -> Vec<String> {
        T::VARIANTS.iter().map(|v| serde_json::to_value(v).unwrap().as_str().unwrap().to_string()).collect()
    }

    fn strum_names<T: VariantNames>() -> Vec<String> {
        T::VARIANTS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_choice_has_one_spelling() {
        macro_rules! same {
            ($($t:ty),+) => { $(assert_eq!(serde_names::<$t>(), strum_names::<$t>(), stringify!($t));)+ };
        }
        same!(
            DatasetKind,
            Split,
            OnBadSample,
            Arch,
            Backbone,
            BnStats,
            Precision,
            Schedule,
            Level,
            DccmFrom,
            CrossDomainAnchors,
            ContrastSampling,
            Preset,
            TranslateMethod,
            FdaWindow,
            FdaMode,
            Strategy,
            Annotation,
            PairedAgainst
        );
        assert_eq!(strum_names::<Arch>(), ["deeplabv2", "deeplabv3plus"]);
        assert_eq!(strum_names::<Backbone>(), ["resnet101", "resnet50", "resnet18", "tiny"]);
        assert_eq!(strum_names::<Precision>(), ["fp32", "bf16"]);
        assert_eq!(
            strum_names::<Preset>(),
            ["al-wo-as", "al-w-as", "mcu-i", "mcu-d", "p2p", "p2p-c2c", "full", "ripu", "entropy", "margin", "random"]
        );
        assert_eq!(strum_names::<Strategy>(), ["ada-mcu", "ripu", "entropy", "margin", "random"]);
        assert_eq!(strum_names::<Level>(), ["intra-image", "cross-image", "cross-domain"]);
        assert_eq!(strum_names::<CrossDomainAnchors>(), ["both", "target", "source"]);
        assert_eq!(strum_names::<ContrastSampling>(), ["uniform", "class-balanced"]);
        assert_eq!(strum_names::<TranslateMethod>(), ["none", "cyclegan", "fda"]);
        assert_eq!(allowed(&["a", "b", "c"]), "\"a\", \"b\" or \"c\"");
    }
}
