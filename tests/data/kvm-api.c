/* kvm-api: opens /dev/kvm and prints the KVM API version that the KVM_GET_API_VERSION ioctl
 * returns. tests/build_nix.rs compiles it statically and runs it as a build's builder, to see
 * that a build requiring the `kvm` feature really gets a usable /dev/kvm in its sandbox. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>

int main(void) {
  int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    perror("open /dev/kvm");
    return 1;
  }
  int version = ioctl(fd, KVM_GET_API_VERSION, 0);
  if (version < 0) {
    perror("ioctl KVM_GET_API_VERSION");
    return 1;
  }
  printf("KVM API version %d\n", version);
  return 0;
}
