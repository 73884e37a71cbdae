"""openood.evaluation_api.postprocessor.postprocessors, reduced to the methods hrp-ood maps (OpenOOD v1.5 code)."""

import torch
import torch.nn as nn

num_classes_dict = {"cifar10": 10, "cifar100": 100, "imagenet200": 200, "imagenet": 1000}
normalization_dict = {"cifar10": [[0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]]}


class BasePostprocessor:
    def __init__(self, config):
        self.config = config

    def setup(self, net, id_loader_dict, ood_loader_dict):
        pass

    @torch.no_grad()
    def postprocess(self, net, data):
        output = net(data)
        score = torch.softmax(output, dim=1)
        conf, pred = torch.max(score, dim=1)
        return pred, conf

    def inference(self, net, data_loader, progress=True):
        pred_list, conf_list, label_list = [], [], []
        for batch in data_loader:
            data = batch["data"].cuda()
            label = batch["label"].cuda()
            pred, conf = self.postprocess(net, data)
            pred_list.append(pred.cpu())
            conf_list.append(conf.cpu())
            label_list.append(label.cpu())
        return (
            torch.cat(pred_list).numpy().astype(int),
            torch.cat(conf_list).numpy(),
            torch.cat(label_list).numpy().astype(int),
        )


class EBOPostprocessor(BasePostprocessor):
    def __init__(self, config):
        super().__init__(config)
        self.temperature = config.postprocessor.postprocessor_args.temperature

    @torch.no_grad()
    def postprocess(self, net, data):
        output = net(data)
        _, pred = torch.max(torch.softmax(output, dim=1), dim=1)
        return pred, self.temperature * torch.logsumexp(output / self.temperature, dim=1)


class MaxLogitPostprocessor(BasePostprocessor):
    @torch.no_grad()
    def postprocess(self, net, data):
        conf, pred = torch.max(net(data), dim=1)
        return pred, conf


class ODINPostprocessor(BasePostprocessor):
    def __init__(self, config):
        super().__init__(config)
        self.temperature = config.postprocessor.postprocessor_args.temperature
        self.noise = config.postprocessor.postprocessor_args.noise
        try:
            self.input_std = normalization_dict[config.dataset.name][1]
        except KeyError:
            self.input_std = [0.5, 0.5, 0.5]
        self.args_dict = config.postprocessor.postprocessor_sweep

    def postprocess(self, net, data):
        data.requires_grad = True
        output = net(data)
        labels = output.detach().argmax(axis=1)
        loss = nn.CrossEntropyLoss()(output / self.temperature, labels)
        loss.backward()
        gradient = (torch.ge(data.grad.detach(), 0).float() - 0.5) * 2
        for channel in range(3):
            gradient[:, channel] = gradient[:, channel] / self.input_std[channel]
        output = net(torch.add(data.detach(), gradient, alpha=-self.noise)) / self.temperature
        output = output.detach()
        output = output - output.max(dim=1, keepdims=True).values
        conf, pred = (output.exp() / output.exp().sum(dim=1, keepdims=True)).max(dim=1)
        return pred, conf

    def set_hyperparam(self, hyperparam):
        self.temperature = hyperparam[0]
        self.noise = hyperparam[1]

    def get_hyperparam(self):
        return [self.temperature, self.noise]


class SetupOnCudaPostprocessor(BasePostprocessor):
    """mds / knn / vim / react: their setup moves every ID batch with .cuda() (the scores are not needed here)."""

    def setup(self, net, id_loader_dict, ood_loader_dict):
        for batch in id_loader_dict["train"]:
            batch["data"].cuda()


class MDSPostprocessor(SetupOnCudaPostprocessor):
    def __init__(self, config):
        super().__init__(config)
        self.num_classes = num_classes_dict[config.dataset.name]
        self.setup_flag = False


postprocessors = {
    "msp": BasePostprocessor,
    "ebo": EBOPostprocessor,
    "mls": MaxLogitPostprocessor,
    "odin": ODINPostprocessor,
    "mds": MDSPostprocessor,
    "knn": SetupOnCudaPostprocessor,
    "vim": SetupOnCudaPostprocessor,
    "react": SetupOnCudaPostprocessor,
}
