//! End-to-end test harness: boots the Phalanx image in an emulator and judges the serial log.
